"""The foundation every other package builds on: typed configs (``config``), run folders and metrics
(``runs``), model loading (``models``), devices and dtypes (``precision``), LoRA/QLoRA (``adapters``), TRL
``TrainingArguments`` (``training``), process groups (``distributed``), launchers (``launch``) and generation
(``generation``).

It imports nothing from ``data``, ``reward``, ``ui`` or ``alignment`` (``tests/test_layers.py``)."""
