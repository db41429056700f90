#!/usr/bin/env bash
# Entry point of the training image (Dockerfile.train): `pneumoscreen train`, then
# `pneumoscreen export`, configured by environment variables. With arguments it runs
# `pneumoscreen <arguments>` instead, e.g. `... run --rm train evaluate --run /runs/x --data /data`.
#
#   DATA_DIR         data folder, <root>/{train,val,test}/{NORMAL,PNEUMONIA}/  (/data, mounted read-only)
#   WEIGHTS          imagenet | none | a weights file, e.g. /weights/mobilenet_1_0_224_tf_no_top.h5
#   BACKBONE         mobilenet | xception | mobilenetv2                         (mobilenet)
#   RUN_DIR          run folder: Keras model, report, run.json            (/runs/$BACKBONE)
#   BUNDLE_DIR       where the bundle is written                           (/models/custom)
#   MODEL_VERSION    version recorded in the bundle                        (1.0.0)
#   EPOCHS_FROZEN, EPOCHS_FINETUNE, BATCH_SIZE   passed on when set
#   DISTRIBUTE       none | mirrored (tf.distribute.MirroredStrategy over the visible GPUs), when set
#   TRAIN_ARGS, EXPORT_ARGS                      any further options, split on spaces
set -euo pipefail

if [ "$#" -gt 0 ]; then
  exec pneumoscreen "$@"
fi

DATA_DIR="${DATA_DIR:-/data}"
WEIGHTS="${WEIGHTS:-imagenet}"
BACKBONE="${BACKBONE:-mobilenet}"
RUN_DIR="${RUN_DIR:-/runs/${BACKBONE}}"
BUNDLE_DIR="${BUNDLE_DIR:-/models/custom}"
MODEL_VERSION="${MODEL_VERSION:-1.0.0}"
# On the /runs volume, so a second run does not decode the images again.
CACHE_DIR="${CACHE_DIR:-/runs/.cache}"

if [ ! -d "${DATA_DIR}/train" ]; then
  echo "error: no training data in ${DATA_DIR}: expected ${DATA_DIR}/train/{NORMAL,PNEUMONIA}/." >&2
  echo "Mount your data folder there (compose: TRAIN_DATA=/path/to/chest_xray)." >&2
  exit 2
fi
# `pneumoscreen export` refuses to replace a bundle without --force (API pods may be serving
# it): say so now, not after an hour of training.
if [ -f "${BUNDLE_DIR}/model.json" ] && [[ " ${EXPORT_ARGS:-} " != *" --force "* ]]; then
  echo "error: ${BUNDLE_DIR} already holds a bundle; choose another BUNDLE_DIR (compose: TRAIN_BUNDLE)," >&2
  echo "or set EXPORT_ARGS=--force to replace it." >&2
  exit 2
fi
case "${WEIGHTS}" in
  imagenet|none) ;;
  *)
    if [ ! -f "${WEIGHTS}" ]; then
      echo "error: weights file ${WEIGHTS} not found (mount it under /weights, or use WEIGHTS=imagenet|none)." >&2
      exit 2
    fi
    ;;
esac

train_args=(--data "${DATA_DIR}" --backbone "${BACKBONE}" --weights "${WEIGHTS}" --out "${RUN_DIR}" --cache-dir "${CACHE_DIR}")
[ -n "${EPOCHS_FROZEN:-}" ] && train_args+=(--epochs-frozen "${EPOCHS_FROZEN}")
[ -n "${EPOCHS_FINETUNE:-}" ] && train_args+=(--epochs-finetune "${EPOCHS_FINETUNE}")
[ -n "${BATCH_SIZE:-}" ] && train_args+=(--batch-size "${BATCH_SIZE}")
[ -n "${DISTRIBUTE:-}" ] && train_args+=(--distribute "${DISTRIBUTE}")
# shellcheck disable=SC2206  # word splitting of the free-form options is intended
train_args+=(${TRAIN_ARGS:-})

export_args=(--run "${RUN_DIR}" --out "${BUNDLE_DIR}" --data "${DATA_DIR}" --version "${MODEL_VERSION}" --cache-dir "${CACHE_DIR}")
# shellcheck disable=SC2206
export_args+=(${EXPORT_ARGS:-})

echo "+ pneumoscreen train ${train_args[*]}"
pneumoscreen train "${train_args[@]}"
echo "+ pneumoscreen export ${export_args[*]}"
pneumoscreen export "${export_args[@]}"
echo "bundle written to ${BUNDLE_DIR}"
