mlx_flash::attention_quant_decode<T, KST, VST, mlx_flash::Features<SOFTCAP, false, 0, WINDOW, false, SINKS, false>, SINKS, D, DV, BITS, GS, NW, PF, POOL, KEYS_M, FOLD, L2PF, TILES, LATE, QSF>(
    q, mlx_flash::quant_cache(kw, ks, kb, kw_strides, ks_strides, kb_strides),
    mlx_flash::quant_cache(vw, vs, vb, vw_strides, vs_strides, vb_strides), sinks, ip, fp, ns, out, lse, scratch, tk);
