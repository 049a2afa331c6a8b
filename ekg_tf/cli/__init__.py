"""absl command-line apps (installed as console scripts ekg-*)."""
