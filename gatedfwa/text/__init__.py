"""Text to token ids and back: the tokenizers that training and generation share, and the
byte tokenizer saved with every checkpoint (tokenizer.py). Imports nothing itself."""
