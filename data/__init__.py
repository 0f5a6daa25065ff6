"""Data layer: record schemas, loaders for local files and public formats, instruction templates,
the annotation store, and the datasets bundled with the project (``data/bundled``)."""
