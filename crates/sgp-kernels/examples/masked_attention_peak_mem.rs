//! Runs ONE masked-attention variant once and prints its wall time and the process's peak
//! resident memory (VmHWM). Run each variant in its own process so peaks don't mix:
//!
//! ```text
//! cargo run -p sgp-kernels --example masked_attention_peak_mem -- fused fwdbwd 4096 8 1
//! cargo run -p sgp-kernels --example masked_attention_peak_mem -- naive fwdbwd 4096 8 1
//! ```
//! Arguments: `fused|naive`, `fwd|fwdbwd`, tokens L (Lq = Lk), heads H, batch B
//! (model width 256, so D = 256/H), soft mode, `[B,L]` key map, query scaling on.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sgp_kernels::masked_attention::{masked_attention, naive_masked_attention, MaskedAttentionOptions, QueryScaling};

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 5 {
        return Err("usage: fused|naive fwd|fwdbwd L H B".into());
    }
    let fused = match args[0].as_str() {
        "fused" => true,
        "naive" => false,
        other => return Err(format!("unknown variant {other}").into()),
    };
    let backward = match args[1].as_str() {
        "fwd" => false,
        "fwdbwd" => true,
        other => return Err(format!("unknown pass {other}").into()),
    };
    let (l, h, b): (usize, usize, usize) = (args[2].parse()?, args[3].parse()?, args[4].parse()?);
    let d = 256 / h;
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let p = Tensor::rand(0f32, 1.0, (b, l), &dev)?;
    let opts = MaskedAttentionOptions {
        query_scaling: QueryScaling::FromKeyMap,
        ..Default::default()
    };
    let f = if fused {
        masked_attention
    } else {
        naive_masked_attention
    };
    let base_kib = vm_hwm_kib().unwrap_or(0);
    let start = Instant::now();
    let checksum = if backward {
        let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
        let out = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &p, &opts)?;
        let grads = out.sum_all()?.backward()?;
        let dq = grads.get(qv.as_tensor()).ok_or("no dq")?;
        dq.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
    } else {
        f(&q, &k, &v, &p, &opts)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
    };
    let secs = start.elapsed().as_secs_f64();
    let peak_kib = vm_hwm_kib().unwrap_or(0);
    println!(
        "variant={} pass={} L={l} H={h} B={b} D={d} time_s={secs:.3} peak_MiB={:.1} inputs_MiB={:.1} extra_MiB={:.1} checksum={checksum:.6e}",
        args[0],
        args[1],
        peak_kib as f64 / 1024.0,
        base_kib as f64 / 1024.0,
        peak_kib.saturating_sub(base_kib) as f64 / 1024.0
    );
    Ok(())
}
