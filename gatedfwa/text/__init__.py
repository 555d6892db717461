"""Text to token ids and back: the byte tokenizer saved with every checkpoint
(byte_tokenizer.py), the tokenizers training and generation share and the record a
checkpoint keeps of them (tokenizer.py), and streaming decoding (stream_decoder.py).
Imports nothing itself."""
