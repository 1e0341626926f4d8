-- Argo CD health check for appset.dev/AppSet (Lua 5.1, as Argo CD runs it).
--
-- Healthy: the operator has reported the current generation and its Ready condition is True
-- (the rollout is complete and every replica is available; with OnDelete, only users' pod
-- deletions may be missing). Degraded: the rollout made no progress for
-- progressDeadlineSeconds (Progressing=False, ProgressDeadlineExceeded). Progressing:
-- everything else, with the operator's own message.
local hs = {
  status = "Progressing",
  message = "Waiting for the appset operator to report a status",
}

local function find_condition(status, condition_type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == condition_type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the appset operator to observe generation " .. generation
    .. " (the status describes generation " .. status.observedGeneration .. ")"
  return hs
end

local progressing = find_condition(status, "Progressing")
if progressing ~= nil and progressing.status == "False"
    and progressing.reason == "ProgressDeadlineExceeded" then
  hs.status = "Degraded"
  hs.message = progressing.message
  return hs
end

local ready = find_condition(status, "Ready")
if ready ~= nil then
  if ready.status == "True" then
    hs.status = "Healthy"
  end
  hs.message = ready.message
  return hs
end

-- A status written by an operator version without the Ready condition.
if progressing ~= nil then
  if progressing.status == "True" and (progressing.reason == "RolloutComplete"
      or progressing.reason == "AwaitingPodDeletion") then
    hs.status = "Healthy"
  end
  hs.message = progressing.message
end
return hs
