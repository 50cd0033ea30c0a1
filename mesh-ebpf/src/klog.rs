//! The programs' decisions in their own log (aya-log, at debug level), when the agent
//! has switched it on at run time (`settings::KERNEL_LOG`, set by `meshctl log-level
//! set --kernel debug`). Off, each decision costs one array lookup and nothing else.
//!
//! Every line starts with `netns=<cookie>`: the agent names the pod from it.

/// Whether the kernel log is on.
#[cfg(not(feature = "no-kernel-log"))]
#[inline(always)]
pub fn on() -> bool {
    use mesh_common::settings;
    crate::maps::setting(settings::KERNEL_LOG) == settings::KERNEL_LOG_DEBUG
}

/// Built without the log (the benchmark's reference): every log call is dead code.
#[cfg(feature = "no-kernel-log")]
#[inline(always)]
pub fn on() -> bool {
    false
}
