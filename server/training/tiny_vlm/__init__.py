"""tiny-vlm's recipe: easy-vqa as training data (`data`, `texts`), the two-stage training (`train`)
and the quality check on the test split (`evaluate`). Needs the `train` extra (easy-vqa)."""
