mlx_flash::fp8_quantize_rows<T, VEC, FMT>(x, ip, codes, scale);
