//! The wasmtime engine shared by every plugin: its configuration, the epoch ticker that
//! enforces call deadlines, and the on-disk cache of compiled components.
//!
//! This module compiles nothing and runs no guest code; it only sets the stage for
//! [`super::call`].

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use wasmtime::{Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy};

use super::PluginError;

/// How often the engine's epoch advances; call budgets are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Most plugin calls that may hold an instance at once. The pooling allocator reserves address
/// space for this many instances up front, and calls beyond it wait for a slot.
pub const MAX_CONCURRENT_CALLS: u32 = 32;

/// The limits that size the engine, taken from the plugin specs.
pub(crate) struct EngineSettings {
    /// Largest memory any plugin may have, in bytes.
    pub max_memory_bytes: usize,
    /// Prepared cache directory, if caching is on.
    pub cache_dir: Option<PathBuf>,
}

/// Builds the one engine of a [`super::PluginHost`].
pub(crate) fn build_engine(settings: &EngineSettings) -> Result<Engine, PluginError> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // Epochs, not fuel: a deadline check costs a load and a compare per loop back-edge, while
    // fuel counts every instruction.
    config.epoch_interruption(true);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(settings)));

    if let Some(dir) = &settings.cache_dir {
        let mut cache_config = CacheConfig::new();
        cache_config.with_directory(dir);
        let cache = Cache::new(cache_config)
            .map_err(|err| PluginError::Cache { path: dir.clone(), reason: format!("{err:#}") })?;
        config.cache(Some(cache));
    }

    Engine::new(&config).map_err(|err| PluginError::Engine { reason: format!("{err:#}") })
}

/// Sizes the pooling allocator. A Rust guest built for wasm32-wasip2 is one component made of
/// a handful of core instances (the program, the WASI adapter, shims), one or two memories and
/// a few tables, so the per-call totals below leave room for that shape.
fn pooling(settings: &EngineSettings) -> wasmtime::PoolingAllocationConfig {
    let calls = MAX_CONCURRENT_CALLS;
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(calls)
        .total_core_instances(calls * 8)
        .total_memories(calls * 2)
        .total_tables(calls * 8)
        .total_stacks(calls)
        .max_memory_size(settings.max_memory_bytes);
    pool
}

/// Creates the cache directory readable by its owner only (the host deserializes what it finds
/// there, so nobody else may write into it) and returns its absolute path.
pub(crate) fn prepare_cache_dir(dir: &Path) -> Result<PathBuf, PluginError> {
    let fail = |reason: String| PluginError::Cache { path: dir.to_path_buf(), reason };

    std::fs::create_dir_all(dir).map_err(|err| fail(format!("cannot create it: {err}")))?;
    restrict_to_owner(dir).map_err(|err| fail(format!("cannot set mode 0700: {err}")))?;
    std::fs::canonicalize(dir).map_err(|err| fail(format!("cannot resolve it: {err}")))
}

#[cfg(unix)]
fn restrict_to_owner(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn restrict_to_owner(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Number of epoch ticks that gives a call at least `budget` of run time. The deadline is
/// checked against a counter that another thread bumps, so one extra tick covers the part of
/// the current tick that has already gone by.
pub(crate) fn deadline_ticks(budget: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    let whole = budget.as_nanos().div_ceil(tick).max(1);
    u64::try_from(whole).unwrap_or(u64::MAX - 1).saturating_add(1)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread (a tokio timer would
/// stall when the runtime is busy, which is exactly when a deadline matters). The thread ends
/// within one tick after this handle is dropped.
pub(crate) struct EpochTicker {
    /// Dropping the sender disconnects the channel, which is the thread's signal to stop.
    _stop: mpsc::Sender<()>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine) -> Result<EpochTicker, PluginError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".to_string())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    engine.increment_epoch();
                }
            })
            .map_err(|err| PluginError::Engine {
                reason: format!("cannot start the epoch ticker thread: {err}"),
            })?;
        Ok(EpochTicker { _stop: stop })
    }
}
