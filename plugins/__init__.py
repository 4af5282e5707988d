"""regfw's built-in regularizers (import package ``regfw_plugins``).

Each module here is an ordinary regfw plugin, declared as an entry point in the ``regfw``
group of regfw's ``pyproject.toml`` and loaded through the same path as third-party plugins.
They are the model for writing one: a config dataclass, a ``Regularizer`` subclass and a
``regfw_register_regularizers`` hook implementation.
"""
