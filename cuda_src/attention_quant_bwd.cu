mlx_flash::attention_quant_bwd<T, KST, VST, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, false, false, false>, D, DV, BITS, GS, W, RW>(
    q, mlx_flash::quant_cache(kw, ks, kb, kw_strides, ks_strides, kb_strides),
    mlx_flash::quant_cache(vw, vs, vb, vw_strides, vs_strides, vb_strides), mask, alibi, ip, fp, lse, delta, dout, dq);
