"""Prompt data for RL. Import from the modules (kept out of this file so `python -m` runs
them cleanly and importing the package stays cheap; nothing here imports torch):

    verl_mtp.data.synthetic_math   the synthetic arithmetic task and its parquet/JSONL writers
    verl_mtp.data.tokenizer        small BPE tokenizer training, ChatML template, encode_chat
    verl_mtp.data.rl_dataset       verl-format loading with per-row validation, PromptLoader
"""
