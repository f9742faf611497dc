"""The Aftershock coordinator: the `aftershock` CLI and the experiment engine."""
