"""An example cockpit-lite plugin (docs/plugins.md)."""
