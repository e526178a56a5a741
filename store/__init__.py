"""The Redis schema the API and the workers share.

``keys`` names every key (one module, units in names), ``records`` encodes the task, batch
and API-key records, ``scripts`` holds the Lua scripts that make state transitions atomic
and fenced by the attempt that owns a task's lease.
"""
