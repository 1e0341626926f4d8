-- Argo CD health check for appset.dev/PodInjection (Lua 5.1, as Argo CD runs it).
--
-- A PodInjection has no status: the appset webhook reads it when each selected pod is created,
-- so once the API server has stored it (its schema and validation rules passed) it is in
-- effect. Healthy, with what it injects as the message.
local hs = { status = "Healthy" }

local function names(list)
  local out = {}
  if list ~= nil then
    for _, item in ipairs(list) do
      table.insert(out, item.name)
    end
  end
  return out
end

local spec = obj.spec or {}
local containers = names(spec.initContainers)
local volumes = names(spec.volumes)
local parts = {}
if #containers > 0 then
  table.insert(parts, "init containers " .. table.concat(containers, ", "))
end
if #volumes > 0 then
  table.insert(parts, "volumes " .. table.concat(volumes, ", "))
end
if #parts == 0 then
  hs.message = "Injects nothing"
else
  hs.message = "Injects " .. table.concat(parts, " and ") .. " into the pods it selects at creation"
end
return hs
