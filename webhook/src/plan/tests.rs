//! Unit tests of the planner: every pod shape, order, conflicts and idempotency. Each patch is
//! applied with [`crate::patch::apply`] and the result read back as a Pod.

use super::*;
use crate::patch;
use appset_crds::podinjection::InjectedVolumeMount;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

fn container(name: &str, image: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(image.into()),
        ..Default::default()
    }
}

fn git_content() -> PodInjectionSpec {
    PodInjectionSpec {
        selector: LabelSelector::default(),
        init_container_placement: InitContainerPlacement::First,
        init_containers: vec![Container {
            args: Some(vec![
                "clone".into(),
                "https://example.invalid/site.git".into(),
                "/work".into(),
            ]),
            volume_mounts: Some(vec![VolumeMount {
                name: "content".into(),
                mount_path: "/work".into(),
                ..Default::default()
            }]),
            ..container("git-clone", "alpine/git:2.47")
        }],
        volumes: vec![InjectedVolume {
            name: "content".into(),
            empty_dir: EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..Default::default()
            },
        }],
        volume_mounts: vec![InjectedVolumeMount {
            name: "content".into(),
            mount_path: "/usr/share/nginx/html".into(),
            sub_path: None,
            read_only: true,
            containers: vec![],
        }],
    }
}

fn pod(spec: k8s_openapi::api::core::v1::PodSpec) -> Pod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("web".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn nginx_pod() -> Pod {
    pod(k8s_openapi::api::core::v1::PodSpec {
        containers: vec![container("nginx", "nginx:1.27")],
        ..Default::default()
    })
}

fn cand<'a>(name: &'a str, spec: &'a PodInjectionSpec) -> Candidate<'a> {
    Candidate {
        name,
        generation: 1,
        spec,
    }
}

/// Applies the plan's patch to the pod and returns the patched pod and the plan.
fn run(pod: &Pod, cands: &[Candidate<'_>]) -> (Pod, Plan) {
    let plan = plan(pod, cands);
    let mut doc = serde_json::to_value(pod).expect("pod serializes");
    if let Plan::Patch { ops, .. } = &plan {
        patch::apply(&mut doc, ops).expect("patch applies");
    }
    (serde_json::from_value(doc).expect("patched pod"), plan)
}

fn ops_of(plan: &Plan) -> Vec<AddOp> {
    match plan {
        Plan::Patch { ops, .. } => ops.clone(),
        other => panic!("expected a patch, got {other:?}"),
    }
}

fn paths(plan: &Plan) -> Vec<String> {
    ops_of(plan).into_iter().map(|o| o.path).collect()
}

fn init_names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|v| v.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn nginx_without_init_containers_or_volumes_creates_the_lists() {
    let spec = git_content();
    let (patched, plan) = run(&nginx_pod(), &[cand("git-content", &spec)]);
    assert_eq!(
        paths(&plan),
        vec![
            "/spec/initContainers",
            "/spec/volumes",
            "/spec/containers/0/volumeMounts",
            "/metadata/annotations",
        ]
    );
    let s = patched.spec.expect("spec");
    assert_eq!(init_names(&nginx_pod()).len(), 0);
    assert_eq!(s.init_containers.expect("init")[0], spec.init_containers[0]);
    let vols = s.volumes.expect("volumes");
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "content");
    assert_eq!(
        vols[0]
            .empty_dir
            .as_ref()
            .and_then(|e| e.size_limit.clone()),
        Some(Quantity("64Mi".into()))
    );
    let mounts = s.containers[0].volume_mounts.clone().expect("mounts");
    assert_eq!(mounts[0].mount_path, "/usr/share/nginx/html");
    assert_eq!(mounts[0].read_only, Some(true));
    assert_eq!(
        patched
            .metadata
            .annotations
            .expect("annotations")
            .get(keys::INJECTED),
        Some(&"git-content@1".to_string())
    );
}

#[test]
fn existing_lists_are_appended_to_never_replaced() {
    let spec = git_content();
    let mut p = nginx_pod();
    {
        let s = p.spec.as_mut().expect("spec");
        s.init_containers = Some(vec![container("migrate", "busybox")]);
        s.volumes = Some(vec![Volume {
            name: "cache".into(),
            empty_dir: Some(Default::default()),
            ..Default::default()
        }]);
        s.containers[0].volume_mounts = Some(vec![VolumeMount {
            name: "cache".into(),
            mount_path: "/var/cache/nginx".into(),
            ..Default::default()
        }]);
        s.containers.push(container("exporter", "exporter:1"));
    }
    p.metadata.annotations = Some(
        [("team/owner~x".to_string(), "web".to_string())]
            .into_iter()
            .collect(),
    );
    let (patched, plan) = run(&p, &[cand("git-content", &spec)]);
    assert_eq!(
        paths(&plan),
        vec![
            "/spec/initContainers/0",
            "/spec/volumes/-",
            "/spec/containers/0/volumeMounts/-",
            "/spec/containers/1/volumeMounts",
            "/metadata/annotations/appset.dev~1injected",
        ]
    );
    assert!(ops_of(&plan).iter().all(|o| o.op == "add"));
    assert_eq!(init_names(&patched), vec!["git-clone", "migrate"]);
    let s = patched.spec.expect("spec");
    let vol_names: Vec<_> = s
        .volumes
        .expect("v")
        .iter()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(vol_names, vec!["cache", "content"]);
    assert_eq!(
        s.containers[0].volume_mounts.as_ref().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        s.containers[1].volume_mounts.as_ref().map(Vec::len),
        Some(1)
    );
    let ann = patched.metadata.annotations.expect("annotations");
    assert_eq!(ann.get("team/owner~x"), Some(&"web".to_string()));
    assert_eq!(ann.get(keys::INJECTED), Some(&"git-content@1".to_string()));
}

#[test]
fn placement_first_and_last_in_name_order() {
    let mut a = git_content();
    a.volumes.clear();
    a.volume_mounts.clear();
    a.init_containers = vec![container("a1", "x"), container("a2", "x")];
    let mut b = a.clone();
    b.init_containers = vec![container("b1", "x")];
    let mut z = a.clone();
    z.init_container_placement = InitContainerPlacement::Last;
    z.init_containers = vec![container("z1", "x")];
    let mut y = z.clone();
    y.init_containers = vec![container("y1", "x")];
    let mut p = nginx_pod();
    p.spec.as_mut().expect("spec").init_containers =
        Some(vec![container("own1", "x"), container("own2", "x")]);
    let (patched, _) = run(
        &p,
        &[cand("a", &a), cand("b", &b), cand("y", &y), cand("z", &z)],
    );
    assert_eq!(
        init_names(&patched),
        vec!["a1", "a2", "b1", "own1", "own2", "y1", "z1"]
    );
    // Without init containers of its own, the pod gets the same order in one created list.
    let (patched, plan) = run(
        &nginx_pod(),
        &[cand("a", &a), cand("b", &b), cand("y", &y), cand("z", &z)],
    );
    assert_eq!(init_names(&patched), vec!["a1", "a2", "b1", "y1", "z1"]);
    assert_eq!(paths(&plan)[0], "/spec/initContainers");
}

#[test]
fn mounts_go_only_into_named_containers_and_warn_about_missing_ones() {
    let mut spec = git_content();
    spec.volume_mounts[0].containers = vec!["nginx".into(), "ghost".into()];
    let mut p = nginx_pod();
    p.spec
        .as_mut()
        .expect("spec")
        .containers
        .push(container("sidecar", "x"));
    let (patched, plan) = run(&p, &[cand("git-content", &spec)]);
    let s = patched.spec.expect("spec");
    assert!(s.containers[0].volume_mounts.is_some());
    assert!(s.containers[1].volume_mounts.is_none());
    match plan {
        Plan::Patch { warnings, .. } => {
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].contains("\"ghost\""), "{warnings:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn second_pass_changes_nothing() {
    let spec = git_content();
    let (once, _) = run(&nginx_pod(), &[cand("git-content", &spec)]);
    assert_eq!(plan(&once, &[cand("git-content", &spec)]), Plan::Unchanged);
    // A newer generation does not reinject either: the name is recorded.
    let newer = Candidate {
        generation: 7,
        ..cand("git-content", &spec)
    };
    assert_eq!(plan(&once, &[newer]), Plan::Unchanged);
}

#[test]
fn a_new_injection_on_an_injected_pod_extends_the_record() {
    let a = git_content();
    let mut b = git_content();
    b.init_containers = vec![container("warm", "x")];
    b.volumes.clear();
    b.volume_mounts.clear();
    let (once, _) = run(&nginx_pod(), &[cand("a", &a)]);
    let (twice, plan) = run(&once, &[cand("a", &a), cand("b", &b)]);
    assert_eq!(
        paths(&plan),
        vec![
            "/spec/initContainers/0",
            "/metadata/annotations/appset.dev~1injected"
        ]
    );
    assert_eq!(
        twice
            .metadata
            .annotations
            .expect("a")
            .get(keys::INJECTED)
            .cloned(),
        Some("a@1,b@1".to_string())
    );
}

#[test]
fn identical_entries_are_no_ops_but_recorded() {
    let spec = git_content();
    // The pod already carries everything, with the defaults the API server adds.
    let (injected, _) = run(&nginx_pod(), &[cand("git-content", &spec)]);
    let mut p = injected.clone();
    p.metadata.annotations = None;
    if let Some(ic) = p
        .spec
        .as_mut()
        .and_then(|s| s.init_containers.as_mut())
        .and_then(|v| v.first_mut())
    {
        ic.termination_message_path = Some("/dev/termination-log".into());
        ic.termination_message_policy = Some("File".into());
        ic.image_pull_policy = Some("IfNotPresent".into());
        ic.resources = Some(Default::default());
    }
    let plan = plan(&p, &[cand("git-content", &spec)]);
    assert_eq!(paths(&plan), vec!["/metadata/annotations"]);
    // Two PodInjections declaring the same volume and mount agree.
    let mut twin = spec.clone();
    twin.init_containers.clear();
    let (patched, _) = run(
        &nginx_pod(),
        &[cand("git-content", &spec), cand("twin", &twin)],
    );
    let s = patched.spec.expect("spec");
    assert_eq!(s.volumes.map(|v| v.len()), Some(1));
    assert_eq!(
        s.containers[0].volume_mounts.as_ref().map(Vec::len),
        Some(1)
    );
}

fn deny(plan: Plan) -> (String, Vec<String>) {
    match plan {
        Plan::Deny {
            message,
            injections,
        } => (message, injections),
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn conflicts_with_the_pod_name_both_sides() {
    let spec = git_content();
    let mut p = nginx_pod();
    {
        let s = p.spec.as_mut().expect("spec");
        s.volumes = Some(vec![Volume {
            name: "content".into(),
            host_path: Some(Default::default()),
            ..Default::default()
        }]);
        s.init_containers = Some(vec![container("git-clone", "other:1")]);
        s.containers[0].volume_mounts = Some(vec![VolumeMount {
            name: "site".into(),
            mount_path: "/usr/share/nginx/html".into(),
            ..Default::default()
        }]);
    }
    let (msg, involved) = deny(plan(&p, &[cand("git-content", &spec)]));
    assert_eq!(involved, vec!["git-content"]);
    assert!(
        msg.contains(
            "init container \"git-clone\" of PodInjection \"git-content\" differs from init container \"git-clone\" of the pod"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("volume \"content\" of PodInjection \"git-content\" differs from volume \"content\" of the pod"),
        "{msg}"
    );
    assert!(
        msg.contains("mount of volume \"content\" at \"/usr/share/nginx/html\" in container \"nginx\" by PodInjection \"git-content\" differs from the mount of volume \"site\" at that path by the pod"),
        "{msg}"
    );
}

#[test]
fn conflicts_between_injections_and_with_container_names() {
    let a = git_content();
    let mut b = git_content();
    b.volumes[0].empty_dir.medium = Some("Memory".into());
    b.init_containers = vec![container("nginx", "x")];
    let (msg, involved) = deny(plan(&nginx_pod(), &[cand("a", &a), cand("b", &b)]));
    assert_eq!(involved, vec!["a", "b"]);
    assert!(
        msg.contains("volume \"content\" of PodInjection \"b\" differs from volume \"content\" of PodInjection \"a\""),
        "{msg}"
    );
    assert!(
        msg.contains("init container \"nginx\" of PodInjection \"b\" has the same name as container \"nginx\" of the pod"),
        "{msg}"
    );
}

#[test]
fn nothing_matching_means_unchanged() {
    assert_eq!(plan(&nginx_pod(), &[]), Plan::Unchanged);
    // A pod without a spec (never sent by the API server) is left alone rather than patched
    // at paths that do not exist.
    let spec = git_content();
    assert_eq!(
        plan(&Pod::default(), &[cand("git-content", &spec)]),
        Plan::Unchanged
    );
}

#[test]
fn injected_annotation_round_trips() {
    let entries = parse_injected("b@2, a@10,broken,c@x");
    assert_eq!(
        entries,
        vec![
            ("b".to_string(), 2),
            ("a".to_string(), 10),
            ("broken".to_string(), 0),
            ("c".to_string(), 0)
        ]
    );
    assert_eq!(format_injected(&entries), "a@10,b@2,broken@0,c@0");
}
