"""Callbacks for training frameworks, one module each: ``cockpit_lite.integrations.lightning`` (Lightning's
``Trainer``). Each module imports its framework; this package imports none, so the core never depends on
them."""
