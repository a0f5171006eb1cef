"""fastattn's Triton kernels, installed as ``fastattn.triton_kernels`` (Triton ships a global
package named ``triton_kernels``; ours must not shadow it). The kernels arrive with issue 4."""
