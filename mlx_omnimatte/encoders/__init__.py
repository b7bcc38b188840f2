"""The encoder stages beside the networks they run: the caption through
umT5-XXL (`text`, with its prompt cache) and the first frame through CLIP
ViT-H/14 (`image`)."""
