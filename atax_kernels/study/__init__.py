"""The real-model study: safety-tune a pretrained instruct model with each mitigation and measure the alignment tax.

Layers (imports only downward): ``data`` (examples, group-disjoint splits, the embedded default data), ``judge``
(the documented refusal and exact-match rules), ``models`` (loading a hub/local/GGUF model, chat templates, greedy
generation), ``config`` (the settings), ``checks`` (bad input) and ``prepare`` (model, data, base generations,
splits); ``train`` (one run), ``run`` (the grid, resumable through ``resume``), scoring, report and CLI sit on top
(``python -m atax_kernels.study``).
"""
