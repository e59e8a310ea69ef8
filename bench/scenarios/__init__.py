"""One module per scenario; `bench.registry` lists them. Each returns one JSON-ready result dict (see `bench.report`).

Ratios are computed per repetition from measurements taken back to back inside one
"measured unit" (the machine is shared; its speed drifts by tens of percent within
minutes and collapses when a neighbour takes a core), and the reported ratio is the
median of those paired ratios; `medians` holds the medians of the raw figures. Every
unit runs in a quiet moment and is redone if other processes used the CPU meanwhile
(`Context.measured`); its `noise` entry says how clean it was.
"""
