"""The floor under the API and the workers: the typed settings object (``settings``), the log
set-up (``logging``) and the start-up heap freeze (``heap``). It imports only ``agent``."""
