"""Deployment: predictor, TensorRT, the quantization report.

Importing the package registers the report sections that live in their own modules (report_attention,
report_recon) into deploy/report.py's list, after its built-in ones.
"""
from . import report as _report
from . import report_attention as _report_attention
from . import report_recon as _report_recon

for _fn in (*_report_attention.SECTIONS, *_report_recon.SECTIONS):
    if _fn not in _report.DEFAULT_SECTIONS:
        _report.register_section(_fn)
