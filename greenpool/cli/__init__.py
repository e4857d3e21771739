"""The ``greenpool`` command: ``main`` parses the command line, ``check``, ``bench`` and ``demo``
are its commands, ``process`` what they share as a process (exit statuses, signals, progress),
``config_file`` the configuration a command reads."""
