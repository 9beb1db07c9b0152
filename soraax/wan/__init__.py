"""Wan 2.1's open weights (Wan team 2025) in soraax: a diffusers-format folder read into soraax's own modules.

    transformer/   -> soraax.dit.DiT with Wan's switches (dit_weights.py; exports back to diffusers too)
    text_encoder/  -> soraax.text.t5 (UMT5-XXL), tokenizer/ beside it
    vae/           -> soraax.vae (vae_weights.py)
`folder.py` opens the whole folder.
"""
