"""The result schema: one pyarrow schema per table of the store.

Every table carries ``schema_version`` and ``node_key`` so rows from different quantsweep versions can
live in one store and every row can be traced back to the node (and its config) that produced it.
Readers (report, pandas, DuckDB) read with these schemas so an old or partial file never changes the
inferred types.  Bump ``SCHEMA_VERSION`` whenever a column's meaning changes: node keys include it,
so a bump re-runs the affected nodes instead of mixing incompatible rows.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

#: Node statuses.  ``oom`` is split from ``failed`` because an OOM cell is a *result* (this method does
#: not fit at this batch size on this GPU), not a bug.
STATUSES = ("ok", "failed", "oom", "skipped")
#: Statuses of a ``kind = sweep`` row: written ``running`` before the first cell, then the sweep's outcome
#: (``failed``: some cell did not succeed).
SWEEP_STATUSES = ("running", "ok", "failed", "interrupted")

_KEY_COLUMNS = [
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("sweep_name", pa.string()),
    pa.field("node_key", pa.string(), nullable=False),
]

RUNS = pa.schema(_KEY_COLUMNS + [
    # model | quantize | build | evaluate | profile; plus one row of kind "sweep" per (sweep name, config)
    # whose config_json holds what the sweep asked for (experiment, methods, grid, eval settings).
    pa.field("kind", pa.string()),
    pa.field("status", pa.string()),  # one of STATUSES (sweep rows: SWEEP_STATUSES)
    pa.field("error", pa.string()),  # exception type + message (+ log excerpt) when not ok
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("batch_size", pa.int32()),
    pa.field("shard", pa.int32()),
    pa.field("subjects", pa.list_(pa.string())),
    pa.field("config_json", pa.string()),  # the node's full config, sorted keys
    pa.field("upstream_keys", pa.list_(pa.string())),
    pa.field("artifact_uri", pa.string()),  # checkpoint / engine folder, when the node makes one
    pa.field("result_json", pa.string()),  # small task metadata (sizes, build info, accuracy summary)
    pa.field("hostname", pa.string()),
    pa.field("ray_node_id", pa.string()),
    pa.field("gpu_ids", pa.list_(pa.string())),  # ray.get_gpu_ids() as seen by the task
    pa.field("gpu_name", pa.string()),
    pa.field("gpu_pci_bus_id", pa.string()),
    pa.field("device", pa.string()),  # cpu | cuda:N
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("duration_s", pa.float64()),
    pa.field("attempt", pa.int32()),
    pa.field("versions_json", pa.string()),  # torch / transformers / lm-eval / ... versions
    # IP address of the Ray node the task ran on (hostname is the same for every node of one machine); for
    # a row the driver wrote because Ray lost the cell, the lost node's
    pa.field("node_ip", pa.string()),
])

MMLU_PREDICTIONS = pa.schema(_KEY_COLUMNS + [
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("shard", pa.int32()),
    pa.field("subject", pa.string()),
    pa.field("subcategory", pa.string()),  # original MMLU mapping (not lm-eval's groups)
    pa.field("category", pa.string()),
    pa.field("question_index", pa.int32()),  # row of <subject>_test.csv, 0-based
    pa.field("gold", pa.string()),  # "A".."D"
    pa.field("predicted", pa.string()),  # "A".."D", or "" when a generation has no letter
    pa.field("correct", pa.bool_()),
    pa.field("choice_scores", pa.list_(pa.float64())),  # per-choice log-likelihoods (loglikelihood mode)
    pa.field("generation", pa.string()),  # generated text (generate mode)
    pa.field("scoring", pa.string()),  # loglikelihood | generate
    pa.field("num_fewshot", pa.int32()),
])

THROUGHPUT = pa.schema(_KEY_COLUMNS + [
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("batch_size", pa.int32()),
    pa.field("input_len", pa.int32()),
    pa.field("output_len", pa.int32()),
    pa.field("repeats", pa.int32()),
    pa.field("warmup", pa.int32()),
    pa.field("output_tokens_per_s", pa.float64()),  # batch * output_len / end-to-end (prefill included), median
    pa.field("decode_tokens_per_s", pa.float64()),  # batch * (output_len - 1) / decode time, median
    pa.field("e2e_s", pa.float64()),  # median end-to-end time of one batch
    pa.field("ttft_s", pa.float64()),  # median time to first token
    pa.field("itl_median_s", pa.float64()),  # inter-token latency over all decode steps of all repeats
    pa.field("itl_p90_s", pa.float64()),
    pa.field("energy_j_per_token", pa.float64()),  # NVML total energy delta / output tokens; null on CPU
    pa.field("device", pa.string()),
    pa.field("gpu_name", pa.string()),
    pa.field("driver_version", pa.string()),
    pa.field("dtype", pa.string()),
    pa.field("weight_format", pa.string()),
    pa.field("kv_cache_policy", pa.string()),
    pa.field("weights_note", pa.string()),  # e.g. "real weights" / "random weights, Llama-2-7B shape"
    pa.field("method_note", pa.string()),  # how the numbers were computed, in words
    # what the checkpoint stores: its dtype ("bfloat16"), or the quantized format and the dtype of the other
    # tensors ("int4 packed g128; other tensors bfloat16"); ``dtype`` above is the one that computed
    pa.field("stored_dtype", pa.string()),
    # memory-bandwidth roofline (tasks/roofline.py); null where the engine does not report what it reads
    pa.field("copy_bandwidth_bytes_per_s", pa.float64()),  # this device's copy: bytes read + written / time
    pa.field("decode_bytes_per_step", pa.float64()),  # fewest bytes an average decode step moves
    pa.field("roofline_decode_tokens_per_s", pa.float64()),  # batch * bandwidth / decode_bytes_per_step
    pa.field("roofline_pct", pa.float64()),  # 100 * decode_tokens_per_s / roofline_decode_tokens_per_s
    pa.field("engine", pa.string()),  # which engine generated, in words (null in rows written before)
])

MEMORY = pa.schema(_KEY_COLUMNS + [
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("batch_size", pa.int32()),
    pa.field("device", pa.string()),
    pa.field("gpu_name", pa.string()),
    pa.field("peak_device_memory_bytes", pa.int64()),  # NVML device-wide used, as nvidia-smi (CUDA)
    pa.field("peak_process_memory_bytes", pa.int64()),  # NVML per-process used (CUDA) / peak RSS (CPU)
    pa.field("peak_allocator_memory_bytes", pa.int64()),  # torch.cuda.max_memory_reserved (CUDA)
    pa.field("weights_memory_bytes", pa.int64()),  # bytes of the loaded weights
    pa.field("kv_cache_bytes", pa.int64()),
    pa.field("method_note", pa.string()),
    pa.field("dtype", pa.string()),  # dtype the weights were held and computed in (sets weights_memory_bytes)
    pa.field("stored_dtype", pa.string()),  # what the checkpoint stores, as in throughput
])

FIDELITY = pa.schema(_KEY_COLUMNS + [
    # one row per (method, token window): the method's next-token distributions against the baseline's
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("baseline", pa.string()),  # the method compared with (sweep.baseline); itself -> KL 0, agreement 1
    pa.field("sequence_index", pa.int32()),  # window number within the cell's text, 0-based
    pa.field("tokens", pa.int32()),  # scored tokens of the window (seq_len - 1: the first is the BOS/EOS prefix)
    pa.field("nll_sum", pa.float64()),  # the method's -sum log p(token), natural log: ppl = exp(sum nll / sum tokens)
    pa.field("kl_mean", pa.float64()),  # mean over the scored positions of KL(P_baseline || P_method), nats
    pa.field("kl_p99", pa.float64()),  # 99th percentile over the window's positions
    pa.field("kl_max", pa.float64()),
    pa.field("top1_agreement", pa.float64()),  # fraction of positions where both argmax tokens agree
    pa.field("kl_tokens", pa.list_(pa.float32())),  # KL at every scored position (exact quantiles over rows)
    pa.field("text_source", pa.string()),  # fidelity.text: pydoc_topics_heldout or a local file's path
    pa.field("text_fingerprint", pa.string()),  # hash of the cell's exact token windows
    pa.field("seq_len", pa.int32()),
    pa.field("device", pa.string()),
    pa.field("dtype", pa.string()),  # compute dtype of the method's engine
    pa.field("weight_format", pa.string()),  # the method's weights as the engine ran them (e.g. de-quantized)
    pa.field("baseline_weight_format", pa.string()),
    pa.field("engine", pa.string()),  # which engine computed the logits, in words
    pa.field("method_note", pa.string()),  # how KL, top-1 and nll were computed
])

#: Tables a node fills before its ``runs`` row (which commits them).
DATA_TABLES = ("mmlu_predictions", "throughput", "memory", "fidelity")
#: The data tables each node kind writes: an ``ok`` node without its files is not complete.
KIND_TABLES = {"evaluate": ("mmlu_predictions",), "fidelity": ("fidelity",), "profile": ("throughput", "memory")}

TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "mmlu_predictions": MMLU_PREDICTIONS,
    "throughput": THROUGHPUT,
    "memory": MEMORY,
    "fidelity": FIDELITY,
}


def table_from_rows(table: str, rows: list[dict]) -> pa.Table:
    """Build a table of ``table``'s schema from row dicts; missing columns become null, unknown ones fail."""
    schema = TABLES[table]
    unknown = {k for r in rows for k in r} - set(schema.names)
    if unknown:
        raise ValueError(f"{table}: unknown columns {sorted(unknown)}; allowed: {schema.names}")
    filled = [{name: r.get(name) for name in schema.names} for r in rows]
    return pa.Table.from_pylist(filled, schema=schema)
