"""The floor under the API and the workers: settings, log set-up, start-up heap freeze."""
