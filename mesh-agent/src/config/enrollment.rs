//! Which pods are in the mesh. A pod's own label decides first, then its namespace's,
//! then the source's default:
//!
//! - `mesh.dev/dataplane-mode: enabled` puts a pod (or every pod of a namespace) in;
//!   `none` keeps it out. Istio ambient's `istio.io/dataplane-mode: ambient` / `none`
//!   mean the same, for people migrating; the mesh's own label wins when both are set.
//! - The older pod annotation `mesh.dev/enroll: "false"` / `"true"` still works, as
//!   the pod's own word.
//! - With neither, the source decides: the directory source enrolls every pod it
//!   lists (the directory is written for the mesh), the Kubernetes API source only
//!   labelled ones.
use std::collections::BTreeMap;

use super::{
    error::FieldError,
    model::{Config, ENROLL_ANNOTATION},
};

/// The mesh's enrollment label, on a pod or a namespace.
pub const DATAPLANE_LABEL: &str = "mesh.dev/dataplane-mode";
/// Istio ambient's label, accepted with its values (`ambient`, `none`).
pub const ISTIO_DATAPLANE_LABEL: &str = "istio.io/dataplane-mode";

/// What an object's labels say about the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum DataplaneMode {
    /// Nothing: the enclosing scope decides.
    #[default]
    Unset,
    Enabled,
    /// Kept out, whatever the scope says.
    None,
}

/// Whether pods without a word of their own or their namespace's are in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    Enrolled,
    NotEnrolled,
}

/// The mode the labels of a pod or a namespace give. A value of the mesh's own label
/// other than `enabled`/`none` is an error (a typo must not silently unmesh a pod);
/// Istio's label is Istio's to define, so other values of it are ignored there as here.
pub fn mode_of(labels: &BTreeMap<String, String>) -> Result<DataplaneMode, FieldError> {
    match labels.get(DATAPLANE_LABEL).map(String::as_str) {
        Some("enabled") => return Ok(DataplaneMode::Enabled),
        Some("none") => return Ok(DataplaneMode::None),
        Some(other) => {
            return Err(FieldError::new(
                format!("metadata.labels[{DATAPLANE_LABEL}]"),
                format!("{other:?} is not \"enabled\" or \"none\""),
            ));
        }
        None => {}
    }
    Ok(
        match labels.get(ISTIO_DATAPLANE_LABEL).map(String::as_str) {
            Some("ambient") => DataplaneMode::Enabled,
            Some("none") => DataplaneMode::None,
            _ => DataplaneMode::Unset,
        },
    )
}

/// A pod's own word: its labels, else the older annotation.
pub fn pod_mode(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<DataplaneMode, FieldError> {
    match mode_of(labels)? {
        DataplaneMode::Unset => {}
        mode => return Ok(mode),
    }
    match annotations.get(ENROLL_ANNOTATION).map(String::as_str) {
        None => Ok(DataplaneMode::Unset),
        Some("true") => Ok(DataplaneMode::Enabled),
        Some("false") => Ok(DataplaneMode::None),
        Some(other) => Err(FieldError::new(
            format!("metadata.annotations[{ENROLL_ANNOTATION}]"),
            format!("{other:?} is not \"true\" or \"false\""),
        )),
    }
}

/// The decision: the pod's word, else its namespace's, else the default.
pub fn enrolled(pod: DataplaneMode, namespace: DataplaneMode, default: Default) -> bool {
    match (pod, namespace) {
        (DataplaneMode::Enabled, _) => true,
        (DataplaneMode::None, _) => false,
        (DataplaneMode::Unset, DataplaneMode::Enabled) => true,
        (DataplaneMode::Unset, DataplaneMode::None) => false,
        (DataplaneMode::Unset, DataplaneMode::Unset) => default == Default::Enrolled,
    }
}

impl Config {
    /// Sets every pod's `enroll` from its word, its namespace's and `default`.
    pub fn resolve_enrollment(&mut self, default: Default) {
        let namespaces: BTreeMap<&str, DataplaneMode> = self
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), n.dataplane))
            .collect();
        for pod in &mut self.pods {
            let ns = namespaces
                .get(pod.id.namespace.as_str())
                .copied()
                .unwrap_or_default();
            let enroll = enrolled(pod.dataplane, ns, default);
            // Only a pod whose answer changed is copied out of the shared allocation.
            if pod.enroll != enroll {
                std::sync::Arc::make_mut(pod).enroll = enroll;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DataplaneMode::{Enabled, None as Out, Unset};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_pod_decides_then_its_namespace_then_the_default() {
        for default in [Default::Enrolled, Default::NotEnrolled] {
            assert!(enrolled(Enabled, Out, default));
            assert!(!enrolled(Out, Enabled, default));
            assert!(enrolled(Unset, Enabled, default));
            assert!(!enrolled(Unset, Out, default));
        }
        assert!(enrolled(Unset, Unset, Default::Enrolled));
        assert!(!enrolled(Unset, Unset, Default::NotEnrolled));
    }

    #[test]
    fn labels_ours_over_istios_and_a_typo_is_an_error() {
        let none = BTreeMap::new();
        assert_eq!(
            mode_of(&labels(&[(DATAPLANE_LABEL, "enabled")])),
            Ok(Enabled)
        );
        assert_eq!(
            mode_of(&labels(&[(ISTIO_DATAPLANE_LABEL, "ambient")])),
            Ok(Enabled)
        );
        assert_eq!(
            mode_of(&labels(&[(ISTIO_DATAPLANE_LABEL, "none")])),
            Ok(Out)
        );
        assert_eq!(
            mode_of(&labels(&[(ISTIO_DATAPLANE_LABEL, "sidecar")])),
            Ok(Unset)
        );
        assert_eq!(
            mode_of(&labels(&[
                (DATAPLANE_LABEL, "none"),
                (ISTIO_DATAPLANE_LABEL, "ambient")
            ])),
            Ok(Out)
        );
        let e = mode_of(&labels(&[(DATAPLANE_LABEL, "enable")])).unwrap_err();
        assert_eq!(e.field, "metadata.labels[mesh.dev/dataplane-mode]");
        assert_eq!(mode_of(&none), Ok(Unset));
        // The older annotation is the pod's word when no label says anything.
        let off = labels(&[(ENROLL_ANNOTATION, "false")]);
        assert_eq!(pod_mode(&none, &off), Ok(Out));
        assert_eq!(
            pod_mode(&labels(&[(DATAPLANE_LABEL, "enabled")]), &off),
            Ok(Enabled)
        );
        assert!(pod_mode(&none, &labels(&[(ENROLL_ANNOTATION, "no")])).is_err());
    }
}
