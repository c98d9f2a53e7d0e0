"""Training with a surgered model: losses (:mod:`.losses`), R-Drop's two passes (:mod:`.rdrop`),
one loss for any loop (:mod:`.compute`), resume and seeding (:mod:`.state`), optimizer groups
(:mod:`.groups`) and the transformers Trainer integration (:mod:`.trainer`, imported on first use:
it loads the Trainer stack)."""
