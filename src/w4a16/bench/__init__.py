"""The benchmark harness behind ``w4a16 bench`` (BENCHMARKS.md describes how measurements are made).

    shapes    what is measured: layer presets, custom shapes, M values, grid points
    roofline  bytes, FLOPs, the roofline floor and figures of merit
    timing    CUDA-graph, eager and fake timers over rotating weight copies
    ceilings  copy bandwidth and fp16 GEMM rate, measured in the same run
    env       card, driver and versions for the report header
    data      random operands and the relative error check
    peers     w4a16, cuBLAS fp16 / bf16, torch's int4 kernel, optional gemlite
    settings  the run's options, validated
    runner    check against the reference, then time every peer at every point
    report    markdown, CSV and JSON
    plots     speedup and roofline PNGs
    cli       ``add_parser(subparsers)`` and ``run(args)``
"""
