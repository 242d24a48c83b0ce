-- Argo CD health check for the loraplane.io kinds FineTuneJob, Adapter and ModelRoute (one script for all three;
-- docs/gitops.md shows the argocd-cm keys). It reads what kstatus (Flux, `kubectl wait`) reads:
--   status.observedGeneration behind metadata.generation -> Progressing (the operator has not seen the spec)
--   Stalled=True     -> Degraded     (someone must fix what the reason names; docs/troubleshooting.md)
--   Ready=True       -> Healthy
--   Reconciling=True -> Progressing  (pulling, training, loading, rolling out: waiting helps)
--   Ready=False, neither of the two -> Suspended (a suspended FineTuneJob, an Adapter no ModelRoute selects)
-- Tested against statuses the operator's own status code writes: tests/unit/controllers/test_gitops_health.py.
local hs = {status = "Progressing", message = "Waiting for the loraplane operator"}
if obj.status == nil then
  return hs
end
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the loraplane operator to process generation " .. generation
  return hs
end
local found = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    found[c.type] = c
  end
end
local function say(c)
  return (c.reason or "") .. ": " .. (c.message or "")
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(found.Stalled)
elseif found.Ready ~= nil and found.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(found.Ready)
elseif found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = say(found.Reconciling)
elseif found.Ready ~= nil then
  hs.status = "Suspended"
  hs.message = say(found.Ready)
end
return hs
