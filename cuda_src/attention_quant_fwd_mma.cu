mlx_flash::attention_quant_fwd_mma<T, KST, VST, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, false, SINKS, false>, D, DV, BITS, GS, NW, BN>(
    q, mlx_flash::quant_cache(kw, ks, kb, kw_strides, ks_strides, kb_strides),
    mlx_flash::quant_cache(vw, vs, vb, vw_strides, vs_strides, vb_strides), mask, alibi, sinks, ip, fp, out, lse);
