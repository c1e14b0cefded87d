"""Disaggregated prefill/decode with KV-cache transfer over aiote.

Run ``python -m examples.kvcache`` from the repository root (docs/kvcache-demo.md).

Modules: ``model`` (the transformer and its paged KV cache), ``router``,
``prefill``, ``decode`` (the three kinds of service process), ``client``,
``protocol`` (control messages over aiote send/recv), ``rendezvous``
(TCPStore), ``cluster`` (launch a whole service on this host), ``workload``
and ``demo``.
"""
