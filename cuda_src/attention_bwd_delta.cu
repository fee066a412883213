mlx_flash::attention_bwd_delta<T, DV, HAS_DLSE>(dout, out, dlse, n[0], delta);
