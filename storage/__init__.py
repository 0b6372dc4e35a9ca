"""Files in and out: checkpoints and step folders, their checksums, the authors' layout, datasets, video and VAEs."""
