"""The embedded demo model's corpus, tokenizer, training, card and evaluation (not shipped: the app and
the bundle carry only the trained files in `resources/demo-model/`, found through `engine.paths`)."""
