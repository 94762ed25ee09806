"""First GPU contact: versions, flow ops vs fp64, old Triton swin vs fp64, varlen_attn, baseline timings."""
import json, math, os, sys, time, traceback
import torch, triton
os.environ["SEMANTICGEN_TRITON_AUTOTUNE"] = "0"
from triton.testing import do_bench
res = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
       "cap": torch.cuda.get_device_capability()}
try:
    import torch.nn.attention as A
    res["fa_impls"] = str(A.list_flash_attention_impls()); res["fa_current"] = str(A.current_flash_attention_impl())
except Exception as e:
    res["fa_impls"] = repr(e)
print(res, flush=True)
dev = "cuda"
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
# --- flow ops
try:
    from semanticgen import ops
    for dt in (torch.float32, torch.bfloat16):
        z, vc, vu = (torch.randn(3, 1001, device=dev, dtype=dt) for _ in range(3))
        out = ops.cfg_euler_step(z, vc, vu, 4.5, -0.02)
        ref = z.double() + (-0.02) * (vu.double() + 4.5 * (vc.double() - vu.double()))
        low = (z + (-0.02) * (vu + 4.5 * (vc - vu)))
        t = torch.rand(3, device=dev)
        zt, u = ops.flow_noising(z, vc, t)
        zr = (1 - t.double()[:, None]) * z.double() + t.double()[:, None] * vc.double()
        vp = vu.clone().requires_grad_()
        loss = ops.flow_matching_loss(vp, z, vc); loss.backward()
        lref = ((vu.double() - (vc.double() - z.double())) ** 2).mean()
        print(f"flow {dt}: cfg rel {rel(out, ref):.2e} (plain {rel(low, ref):.2e}) noising {rel(zt, zr):.2e} "
              f"loss {abs(loss.item() - lref.item()) / lref.item():.2e} grad finite {bool(torch.isfinite(vp.grad).all())}", flush=True)
except Exception:
    traceback.print_exc()
# --- swin triton (current kernels) correctness
from semanticgen.ops import WindowLayout, swin_attention, swin_attention_reference
for dims, D in (((7, 40, 3, 12, 3), 64), ((8, 64, 2, 16, 4), 128), ((5, 33, 0, 0, 2), 80)):
    L = WindowLayout(*dims)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        try:
            q, k, v = (torch.randn(2, L.num_tokens, 3, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
            g = torch.randn_like(q)
            for sh in (False, True):
                o = swin_attention(q, k, v, L, shifted=sh, backend="triton")
                gr = torch.autograd.grad(o, (q, k, v), g)
                qi = [t.detach().double().requires_grad_() for t in (q, k, v)]
                r = swin_attention_reference(*qi, L, shifted=sh); rg = torch.autograd.grad(r, qi, g.double())
                li = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                lo = swin_attention_reference(*li, L, shifted=sh); lg = torch.autograd.grad(lo, li, g)
                errs = [f"{n} {rel(a, e):.1e}/{rel(p, e):.1e}" for n, a, e, p in zip("oqkv", (o, *gr), (r, *rg), (lo, *lg))]
                print(f"triton {dims} D={D} {dt} sh={sh}: " + " ".join(errs), flush=True)
        except Exception:
            traceback.print_exc()
# --- varlen_attn
try:
    from torch.nn.attention.varlen import varlen_attn
    cu = torch.tensor([0, 100, 300, 301, 700], device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(700, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = varlen_attn(q, k, v, cu, cu, 400, 400)
    o.sum().backward()
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(*(t[a:b].double().transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    print(f"varlen_attn rel {rel(o, ref):.2e} grad finite {bool(torch.isfinite(q.grad).all())}", flush=True)
except Exception:
    traceback.print_exc()
# --- timings: 10 s 480p geometry (Tv=60, Sv=1560, Ts=8, Ss=510, Tw=20), H=12, D=128, bf16
os.environ["SEMANTICGEN_TRITON_AUTOTUNE"] = "0"
Ls = WindowLayout(60, 1560, 8, 510, 20); Lb = Ls.with_order("blocked")
N, H, D = Ls.num_tokens, 12, 128
q, k, v = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
wfl = sum(Ls.attention_flops(D, H, shifted=s) for s in (False, True)) / 2
ffl = Ls.full_attention_flops(D, H)
from torch.nn.attention import sdpa_kernel, SDPBackend
def full():
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
cuS = Lb.cu_seqlens(False, dev); mx = Lb.max_window_length(False)
def varlen():
    return varlen_attn(q[0], k[0], v[0], cuS, cuS, mx, mx)
def trit():
    return swin_attention(q, k, v, Ls, shifted=False, backend="triton")
out = {}
for name, fn, fl in (("full_flash", full, ffl), ("varlen_blocked", varlen, Lb.attention_flops(D, H, shifted=False)), ("triton_old_streams", trit, Ls.attention_flops(D, H, shifted=False))):
    try:
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        def fb():
            o = fn(); torch.autograd.grad(o, (q, k, v), g.transpose(1, 2) if name == "full_flash" else (g[0] if name == "varlen_blocked" else g))
        msb = do_bench(fb, warmup=50, rep=500, return_mode="median")
        out[name] = dict(fwd_ms=ms, fwd_tflops=fl / ms / 1e9, fwdbwd_ms=msb, fwdbwd_tflops=3.5 * fl / msb / 1e9)
        print(name, {k2: round(v2, 2) for k2, v2 in out[name].items()}, flush=True)
    except Exception:
        traceback.print_exc()
res["timing_N"] = N; res["timing"] = out
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "smoke.json"), "w"), indent=1)
