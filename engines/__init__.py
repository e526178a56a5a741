"""Library-backed implementations of the core's ports that the API and the workers share."""
