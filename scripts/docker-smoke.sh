#!/usr/bin/env bash
# Smoke test of the Docker deployment, as a user would run it: build the image, run it, wait for healthy,
# /defend/slgs on a sample photo, a stop under load that loses no request, the CLI inside, compose up and
# down (the CPU variant) and the GPU variant's config. Prints each step; exits non-zero at the first failure.
#
#   scripts/docker-smoke.sh                                   # the Dockerfile's CUDA base (pulled)
#   CUDA_IMAGE=elgs-base:bookworm DOCKER_BUILDKIT=0 scripts/docker-smoke.sh   # an offline stand-in base
#
# Needs a Docker engine, curl, and `docker compose` or `docker-compose`. Settings (environment):
#   CUDA_IMAGE      base image build arg (default: the Dockerfile's)
#   IMAGE           tag to build and test (elgs:smoke)
#   SMOKE_MODEL     model served (efficientnet_lite0: its weights ship in its package, no download)
#   FETCH_WEIGHTS   build arg (0: the smoke needs no VGG16 / InceptionV3 weights)
#   SMOKE_PORT      host port of the container (18000; the compose step uses SMOKE_PORT+1)
#   SMOKE_BUILD     0: skip the build, test an existing IMAGE
#   SMOKE_STOP_TIMEOUT  docker stop's grace in the stop under load (45; Docker's default 10 loses requests)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-elgs:smoke}
MODEL=${SMOKE_MODEL:-efficientnet_lite0}
FETCH_WEIGHTS=${FETCH_WEIGHTS:-0}
PORT=${SMOKE_PORT:-18000}
COMPOSE_PORT=$((PORT + 1))
STOP_TIMEOUT=${SMOKE_STOP_TIMEOUT:-45}   # > ELGS_REQUEST_TIMEOUT_S (30 s), as compose's stop_grace_period
IN_FLIGHT=8
NAME=elgs-smoke-$$
PROJECT=elgs-smoke-$$
WORK=$(mktemp -d)
STARTED=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
command -v curl >/dev/null || fail "curl is not installed"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info)"

compose_env=(env ELGS_IMAGE="$IMAGE" ELGS_MODELS="$MODEL" ELGS_HOST_PORT="$COMPOSE_PORT")
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  "${compose_env[@]}" "${COMPOSE[@]}" -p "$PROJECT" down -v -t 5 >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Waits until container $1 reports healthy (its HEALTHCHECK on /health/ready); fails if it stops or times out.
wait_healthy() {
  local container=$1 deadline=$((SECONDS + ${2:-300})) status
  while :; do
    status=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container")
    case $status in
      "running healthy") return 0 ;;
      running*) ;;
      *) docker logs --tail 30 "$container" >&2; fail "container $container is $status" ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || { docker logs --tail 30 "$container" >&2; fail "$container not healthy in time"; }
    sleep 1
  done
}

# POSTs the sample photo to /defend/slgs on port $1; fails unless the answer is 200 with both top-5 lists.
defend_once() {
  local code
  code=$(curl -s -o "$WORK/answer.json" -w '%{http_code}' -F "image=@$WORK/chelsea.png" \
    "http://127.0.0.1:$1/defend/slgs?lambda=3.5")
  [ "$code" = 200 ] || fail "/defend/slgs answered $code: $(head -c 300 "$WORK/answer.json")"
  grep -q '"original_predictions"' "$WORK/answer.json" && grep -q '"predictions"' "$WORK/answer.json" \
    || fail "/defend/slgs answer lacks the predictions: $(head -c 300 "$WORK/answer.json")"
}

if [ "${SMOKE_BUILD:-1}" != 0 ]; then
  step "build $IMAGE (CUDA_IMAGE=${CUDA_IMAGE:-Dockerfile default}, FETCH_WEIGHTS=$FETCH_WEIGHTS)"
  build_started=$SECONDS
  docker build ${CUDA_IMAGE:+--build-arg "CUDA_IMAGE=$CUDA_IMAGE"} --build-arg "FETCH_WEIGHTS=$FETCH_WEIGHTS" \
    -t "$IMAGE" . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
  ok "built in $((SECONDS - build_started)) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
fi

step "a sample photo from the image (scikit-image's chelsea)"
docker run --rm "$IMAGE" python -c "import sys; from elgs.images import sample_photo; \
sample_photo('chelsea').save(sys.stdout.buffer, 'PNG')" > "$WORK/chelsea.png"
[ -s "$WORK/chelsea.png" ] || fail "no sample photo"
ok "$(wc -c < "$WORK/chelsea.png") bytes"

step "run the server with --cpus=1 and wait for healthy"
run_started=$SECONDS
docker run -d --name "$NAME" --cpus=1 -p "127.0.0.1:$PORT:8000" -e ELGS_MODELS="$MODEL" "$IMAGE" >/dev/null
wait_healthy "$NAME"
ok "healthy $((SECONDS - run_started)) s after docker run (health checks every 10 s); uid $(docker exec "$NAME" id -u)"
docker logs "$NAME" > "$WORK/server.log" 2>&1
grep -q "elgs-compute-$MODEL: 1 torch thread (" "$WORK/server.log" \
  || { grep -i "torch thread" "$WORK/server.log" >&2; fail "the server under --cpus=1 does not run 1 torch thread"; }
ok "server log: $(grep -o "elgs-compute-$MODEL: 1 torch thread (.*)" "$WORK/server.log")"

step "POST /defend/slgs on the sample photo"
defend_once "$PORT"
ok "200 with original_predictions and predictions"

step "the CLI in the image as another user (--user 4242:4242): elgs defend, HOME writable"
chmod 777 "$WORK"
docker run --rm --user 4242:4242 -v "$WORK:/out" "$IMAGE" \
  elgs defend skimage:chelsea --model "$MODEL" --method slgs --out /out/defended.png > "$WORK/cli.log" 2>&1 \
  || { cat "$WORK/cli.log" >&2; fail "elgs defend in the image"; }
[ -s "$WORK/defended.png" ] || fail "elgs defend wrote no /out/defended.png"
docker run --rm --user 4242:4242 "$IMAGE" sh -c 'mkdir -p "$HOME/.config/elgs" && echo "$HOME"' > "$WORK/home.log" 2>&1 \
  || { cat "$WORK/home.log" >&2; fail "HOME is not writable for --user runs"; }
ok "defended image written; HOME=$(cat "$WORK/home.log") writable"

step "docker stop during $IN_FLIGHT in-flight /defend/slgs requests (grace $STOP_TIMEOUT s)"
pids=()
for i in $(seq "$IN_FLIGHT"); do
  curl -s -o "$WORK/load$i.json" -w '%{http_code}' -F "image=@$WORK/chelsea.png" \
    "http://127.0.0.1:$PORT/defend/slgs?lambda=3.5" > "$WORK/code$i" 2>/dev/null &
  pids+=($!)
done
# Stop once the server holds them: most waiting in the model's queue (one computes at a time on a CPU).
deadline=$((SECONDS + 20))
while :; do
  queued=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^elgs_queue_depth\{/ {n += $2} END {print int(n)}')
  [ "$queued" -ge $((IN_FLIGHT / 2)) ] || [ "$SECONDS" -ge "$deadline" ] && break
  sleep 0.1
done
running=0
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=$((running + 1)); done
[ "$running" -ge $((IN_FLIGHT / 2)) ] || fail "only $running of $IN_FLIGHT requests still in flight at the stop: not a test"
stop_started=$SECONDS
docker stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null
stop_seconds=$((SECONDS - stop_started))
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
lost=0
for i in $(seq "$IN_FLIGHT"); do
  wait "${pids[$((i - 1))]}" || true
  [ "$(cat "$WORK/code$i")" = 200 ] || { lost=$((lost + 1)); echo "    request $i: HTTP $(cat "$WORK/code$i")" >&2; }
done
[ "$exit_code" = 0 ] || { docker logs --tail 20 "$NAME" >&2; fail "the server exited $exit_code on docker stop"; }
[ "$lost" = 0 ] || fail "$lost of $IN_FLIGHT requests lost during the stop"
ok "$running of $IN_FLIGHT in flight (queue depth $queued) at SIGTERM; stopped in $stop_seconds s, exit 0, all $IN_FLIGHT answered 200"
docker logs "$NAME" > "$WORK/server.log" 2>&1
grep -E "Shutting down|Waiting for|Finished server process" "$WORK/server.log" | sed 's/^/    log: /' || true
docker rm "$NAME" >/dev/null

step "compose (CPU variant): ${COMPOSE[*]} up -d, healthy, /defend/slgs, down"
"${compose_env[@]}" "${COMPOSE[@]}" -p "$PROJECT" up -d --no-build > "$WORK/compose.log" 2>&1 \
  || { cat "$WORK/compose.log" >&2; fail "compose up"; }
container=$("${compose_env[@]}" "${COMPOSE[@]}" -p "$PROJECT" ps -q elgs)
[ -n "$container" ] || fail "compose started no elgs container"
wait_healthy "$container"
defend_once "$COMPOSE_PORT"
[ "$(docker inspect -f '{{.HostConfig.DeviceRequests}}' "$container")" = "[]" ] || fail "the CPU variant reserves a device"
"${compose_env[@]}" "${COMPOSE[@]}" -p "$PROJECT" down -v > "$WORK/compose.log" 2>&1 \
  || { cat "$WORK/compose.log" >&2; fail "compose down"; }
ok "healthy, /defend/slgs answered 200, down"

step "compose GPU variant and the Ray files: config validates"
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config > "$WORK/gpu.yml" || fail "GPU variant config"
grep -q "driver: nvidia" "$WORK/gpu.yml" && grep -q "ELGS_DEVICE: cuda" "$WORK/gpu.yml" || fail "GPU variant lacks the GPU"
for files in "-f deploy/ray/docker-compose.yml" "-f deploy/ray/docker-compose.yml -f deploy/ray/docker-compose.gpu.yml"; do
  # shellcheck disable=SC2086
  RAY_AUTH_TOKEN=smoke "${COMPOSE[@]}" $files config -q || fail "config of $files"
done
ok "docker-compose.gpu.yml reserves an NVIDIA GPU; deploy/ray CPU and GPU files valid"

step "passed in $((SECONDS - STARTED)) s"
