"""Benchmarks and profiling tools for compiled_soap, run as modules from the repository root:

    python -m profiling.bench --preset gpt2-small --device cuda
    python -m profiling.bench_host
    python -m profiling.bench_orthogonalization --device cuda --sizes gpt2-small,pr118-h1024 --batch 16
    python -m profiling.summarize TRACE.json|REPORT.sqlite

profiling/README.md describes each one; profiling/gpu_session.sh runs them in stages on a GPU machine.
"""
