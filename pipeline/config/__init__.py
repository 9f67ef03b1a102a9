"""The experiment config: defaults, YAML loading with ``key=value`` overrides (``loading``), the typed
schema (``schema``), its value types (``types``) and the ``tune:`` and ``kaggle:`` sections."""
