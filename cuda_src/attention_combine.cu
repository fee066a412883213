mlx_flash::attention_combine<T, DV, SINKS, VARLEN>(part_o, part_lse, sinks, ip, ns, out, lse);
