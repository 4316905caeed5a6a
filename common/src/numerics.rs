//! What decides a float's bits besides a computation's own inputs, pinned so that every
//! run on every machine of this kind computes the same ones.
//!
//! Three libraries inside libtorch pick their code path per CPU unless told: MKL's BLAS
//! (`MKL_CBWR`, conditional numerical reproducibility), ATen's vectorised kernels
//! (`ATEN_CPU_CAPABILITY`) and oneDNN, which runs libtorch's CPU LSTM and some matrix
//! products (`ONEDNN_MAX_CPU_ISA`). Each of the three changes a trained victim's bits
//! (README, Reproducibility), and unpinned, the same commit gave an exact-zero control of
//! 0 on one x86-64 machine and 4.8e-8 on another. `pin` sets all three to their AVX-512
//! path on a CPU that has AVX-512 (every machine of this project's kind: measured 1.0-1.3×
//! the native speed, against 1.5-1.7× for the AVX2 path) and to the AVX2 path on one
//! without, unless the environment already names one (to emulate another CPU, as
//! `scripts/test_cpu_paths.sh` does). And the thread count changes how libtorch splits a
//! reduction, so every computation runs on one libtorch thread; parallelism comes from
//! independent computations on threads of their own (`train::train_all`), which cannot
//! change each other's bits. `key` names the paths, so figures computed under different
//! ones are never cached or compared as one.

/// The environment variables that choose a CPU code path, with the AVX-512 and the AVX2
/// value `pin` gives each.
pub const PINS: [(&str, &str, &str); 3] = [("MKL_CBWR", "AVX512", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx512", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE", "AVX2")];

/// Whether this CPU runs the AVX-512 paths (the subset all three libraries need).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Pins the code paths (`PINS`, unless set; on x86-64 only) and libtorch to one thread
/// on this thread and every thread started later. Call it first in `main`, before any
/// libtorch call: the libraries read their variables once, at their first use.
pub fn pin() {
    if cfg!(target_arch = "x86_64") {
        let avx512 = has_avx512();
        for (name, wide, narrow) in PINS {
            if std::env::var_os(name).is_none() {
                // Safe: called at the start of main, before any other thread exists.
                std::env::set_var(name, if avx512 { wide } else { narrow });
            }
        }
    }
    one_thread_here();
    // MKL and oneDNN set themselves up at their first call, reading the variables above:
    // make that call here, on one thread, rather than from training threads racing to it
    // (a suspected cause of one LM exact-zero failure seen once in about 15 runs).
    tch::no_grad(|| {
        let x = tch::Tensor::ones([8, 8], (tch::Kind::Float, tch::Device::Cpu));
        let _ = x.matmul(&x).sum(tch::Kind::Float).double_value(&[]);
    });
}

/// One libtorch (OpenMP, MKL) thread for the calling thread and threads started later.
pub fn one_thread_here() {
    tch::set_num_threads(1);
}

/// A value whose tensors `map_on_threads`' workers read together. tch's `Tensor` is not
/// `Sync`: Rust cannot see that an op only reads its inputs. Libtorch reads a tensor from
/// many threads safely (as multi-threaded inference does); what it does not allow is
/// writing one while others read it. So the value's tensors must only be read while it is
/// shared: every op makes new tensors (no in-place op, no `set_requires_grad` on them), and
/// gradients are returned by `run_backward`, never accumulated into them.
/// tests/mt.rs and tests/attack.rs check that the threads change no bit.
pub struct ReadOnly<'a, T>(&'a T);

impl<'a, T> ReadOnly<'a, T> {
    /// Shares `value` for reading (see the type's contract).
    pub fn new(value: &'a T) -> ReadOnly<'a, T> {
        ReadOnly(value)
    }
    pub fn get(&self) -> &'a T {
        self.0
    }
}

// Safety: only shared references are handed out, and the contract above keeps the
// tensors behind them unwritten while shared.
unsafe impl<T> Sync for ReadOnly<'_, T> {}

/// `f` of every item, in the items' order, computed on `workers` threads of one libtorch
/// thread each that take the next item until none is left: each result is the same bits
/// whatever `workers` is and whichever thread computes it (each runs its own ops alone).
/// The items move to the thread that takes them (a `&mut Victim` may be one). The first
/// error in the items' order is returned.
pub fn map_on_threads<T: Send, R: Send>(workers: usize, items: Vec<T>, f: impl Fn(T) -> anyhow::Result<R> + Sync) -> anyhow::Result<Vec<R>> {
    let n = items.len();
    let workers = workers.clamp(1, n.max(1));
    if workers == 1 {
        return items.into_iter().map(&f).collect();
    }
    let queue = std::sync::Mutex::new(items.into_iter().enumerate().rev().collect::<Vec<_>>());
    let slots: Vec<std::sync::Mutex<Option<anyhow::Result<R>>>> = (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (queue, slots, f) = (&queue, &slots, &f);
            scope.spawn(move || {
                one_thread_here();
                loop {
                    let Some((i, item)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return };
                    let result = f(item);
                    let failed = result.is_err();
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    if failed {
                        // Later items are not needed: the first error in order is at or before i.
                        queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    }
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(result) => out.push(result?),
            None => unreachable!("an item before the first error was left undone"),
        }
    }
    Ok(out)
}

/// The CPU model, as `vendor-family-model` from CPUID (`GenuineIntel-6-143`,
/// `AuthenticAMD-26-2`). The pins give the same bits on one CPU model, not across models:
/// the same demo on an Intel Xeon and an AMD EPYC, both pinned to the AVX-512 paths,
/// trained different victims (docs/reproducibility.md), as the libraries still tune their
/// kernels to the CPU they run on.
pub fn cpu() -> String {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    {
        use std::arch::x86_64::__cpuid;
        // Safe: CPUID exists on every x86-64 CPU.
        let (leaf0, leaf1) = unsafe { (__cpuid(0), __cpuid(1)) };
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        let eax = leaf1.eax;
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf { base_family + ((eax >> 20) & 0xff) } else { base_family };
        let extended_model = if base_family == 0x6 || base_family == 0xf { ((eax >> 16) & 0xf) << 4 } else { 0 };
        let model = ((eax >> 4) & 0xf) | extended_model;
        format!("{}-{family}-{model}", String::from_utf8_lossy(&vendor))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// What decides the bits besides a computation's inputs, as `NAME=value;...`: the CPU
/// model (`cpu`), the code paths (an unset variable reads as `native`) and the thread
/// count. Clean-victim caches are keyed by it and victim files record it, so figures
/// computed on other CPUs or under other code paths are never paired or compared as equal.
pub fn key() -> String {
    let pins: Vec<String> = PINS.iter().map(|(name, _, _)| format!("{name}={}", std::env::var(name).unwrap_or_else(|_| "native".into()))).collect();
    format!("cpu={};{};threads=1", cpu(), pins.join(";"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_key_names_the_cpu_model_and_every_pinned_path() {
        let cpu = super::cpu();
        if cfg!(target_arch = "x86_64") {
            let parts: Vec<&str> = cpu.split('-').collect();
            assert!(parts.len() == 3 && parts[1].parse::<u32>().is_ok() && parts[2].parse::<u32>().is_ok(), "vendor-family-model, got {cpu:?}");
        }
        let key = super::key();
        assert!(key.starts_with(&format!("cpu={cpu};")) && key.ends_with(";threads=1"), "{key}");
        for (name, _, _) in super::PINS {
            assert!(key.contains(&format!("{name}=")), "{key} lacks {name}");
        }
    }
}
