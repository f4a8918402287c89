"""Reading what the GPU would run, on any machine: kernels compiled for sm_90a with the installed
Triton (which ships ptxas and cuobjdump), their SASS parsed and summarized (``disasm.py``), the
package's shipped kernel configurations enumerated (``shipped.py``) and reported or compared with a
baseline build (``report.py``: ``w4a16 sass``)."""
