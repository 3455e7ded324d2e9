"""swatkit: the formats and plumbing beneath swat-min's method files.

The method is read in the six top-level files (model, probe, robustness, train, evaluation,
swat_min). Everything they stand on lives here, one module a concern, and nothing here imports them:

  checkpoint   HF checkpoint folders: config.json, safetensors weights, atomic saves, resume state
  modules      the names of the tunable modules (q, k, v, o, gate, up, down) in an HF checkpoint
  tokenizer    tokenizer.json and the chat formats (ChatML, Llama 3, Mistral, ...)
  generation   batched decoding with a KV cache (model.generate)
  batches      tuning chats -> token ids and loss labels -> padded batches
  speedups     AdamW's foreach and fused forms, and bf16 stochastic rounding
  runlog       the trainer's bookkeeping: settings hash, log.jsonl, checkpoints, resume
  scanfile     the scan's JSON file, its pictures and its terminal summary
  data         readers of instruction and tuning files; the built-in prompts (prompts/)
  hub          hub ids org/name -> a local folder
  files        swat-min's one error type, atomic writes, output folders it owns
  checks       argument checks shared by the Python API and the command line
  options      the command line's options, each declared once
  lora         LoRA adapters (and PEFT's adapter folder)
  scenario     Attack IFT's mix of harmful pairs, the safety-data mix
  plan         the rows of a `run` (which recipe on which module set)
  defences     the post-tuning defences to combine with SWAT (RESTA's restore, Safe LoRA)
  guard        the local safety judge's prompt (Llama Guard 3's format) and its verdict
  memory       the memory a tuning run needs, before it starts
  distributed  FSDP2 under torchrun
  scan_cache   the scan's reuse of the hidden states below a perturbed layer
  figures      SVG pictures (heat maps, curves)
  toy          the offline demo's toy model organism
"""
