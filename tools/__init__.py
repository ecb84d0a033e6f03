"""Developer tools that do not ship with the app (the demo model's corpus, training and card)."""
