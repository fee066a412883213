mlx_flash::attention_combine<T, DV, SPLITS, SINKS, VARLEN>(part_o, part_lse, sinks, ip, out, lse);
