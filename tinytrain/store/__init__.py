"""What a run leaves on disk and reads back: the checkpoint folder's layout and weights, Hugging Face
folders, safe loading of untrusted files, atomic writes."""
