"""Closed-loop driving in ``highway-env`` for the VLA family: scenarios with instructions, multi-view top-down cameras,
an IDM/MOBIL expert with skill and camera labels, and episode metrics (success, route completion, collisions, speed,
a Bench2Drive-style driving score).

- Scenarios (:data:`SCENARIOS`): ``highway`` (``highway-fast-v0``), ``merge`` (``merge-v0``), ``roundabout``
  (``roundabout-v0``, the ego's route is the second exit) and ``intersection`` (``intersection-v0``, destination drawn
  per episode); the instruction is written from the route ("take the second exit", "turn left at the intersection").
- Actions: highway-env's ``ContinuousAction`` ``[acceleration, steering]`` in [-1, 1] (x 5 m/s², x π/4 rad).
- Cameras (:data:`CAMERAS`): top-down renderings of the same scene, centred on the ego (``ego``) or shifted so that
  the road ``ahead`` of, ``behind``, ``left`` or ``right`` of the ego fills the image (world-aligned, the
  simulator's renderer). ``ego`` is the DriveMoE context view; the others are the camera router's candidates.
- State (6): speed / 30, cos / sin heading, lateral offset in the lane / 4, lane heading error, front gap / 50.
  Waypoint (2): a point 15 m ahead on the expert's target lane, in the ego frame, / 15.
- Expert: an :class:`highway_env.vehicle.behavior.IDMVehicle` "brain" (IDM longitudinal, MOBIL lane changes, route
  following) synchronised to the ego's state every step and asked for its action; its skill
  (:data:`SKILLS`: keep lane, change lane, merge, yield, turn, brake) and the view that matters (the side it steers
  to, ``ahead`` otherwise, ``behind`` when a car closes in from behind) are labelled by rules written below.

Needs ``pip install highway-env`` (with gymnasium and pygame-ce); an unknown scenario raises a ValueError naming the
known ones.
"""
from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass, field

import numpy as np

SKILLS = ["keep_lane", "change_lane", "merge", "yield", "turn", "brake"]
CAMERAS = ["ego", "ahead", "behind", "left", "right"]
# where the ego sits in each rendering (fraction of width, height); world-aligned top-down views
_CENTERING = {"ego": (0.5, 0.5), "ahead": (0.15, 0.5), "behind": (0.85, 0.5), "left": (0.5, 0.85),
              "right": (0.5, 0.15)}
STATE_DIM, ACTION_DIM, WAYPOINT_DIM = 6, 2, 2


@dataclass
class Scenario:
    name: str
    env_id: str
    config: dict = field(default_factory=dict)
    max_steps: int = 40
    target_speed: float | None = None


SCENARIOS = {
    "highway": Scenario("highway", "highway-fast-v0", dict(lanes_count=3, vehicles_count=15, duration=40,
                                                           policy_frequency=2), max_steps=30, target_speed=25.0),
    "merge": Scenario("merge", "merge-v0", dict(policy_frequency=2), max_steps=30, target_speed=25.0),
    "roundabout": Scenario("roundabout", "roundabout-v0", dict(duration=30, policy_frequency=2), max_steps=40),
    "intersection": Scenario("intersection", "intersection-v0", dict(duration=25, policy_frequency=2,
                                                                     destination=None), max_steps=30),
}


def check_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]


def _require_highway_env():
    try:
        import gymnasium  # noqa: F401
        import highway_env  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the driving scenarios need highway-env: pip install highway-env "
                                  "(brings gymnasium and pygame-ce)") from exc


class DrivingEnv:
    """One highway-env scenario with multi-view rendering, the IDM expert and episode bookkeeping."""

    def __init__(self, scenario: str, image_size: int = 64, scaling: float = 2.0, cameras=None):
        _require_highway_env()
        os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
        import gymnasium as gym

        self.scenario = check_scenario(scenario)
        self.cameras = list(cameras or CAMERAS)
        unknown = [c for c in self.cameras if c not in _CENTERING]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; expected names from {CAMERAS}")
        self.image_size = image_size
        with warnings.catch_warnings():
            # gymnasium calls every "-v0" id "out of date" when a "-v1" exists; highway-env's v1 ids are different
            # environments (connected-lane variants), not newer versions of these, so the v0 ids are the right ones
            warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")
            self.env = gym.make(self.scenario.env_id, render_mode="rgb_array")
        u = self.env.unwrapped
        orig = u._rewards  # merge-v0's reward indexes discrete actions; give it "idle" for continuous ones
        u._rewards = types.MethodType(lambda self_, a: orig(1 if isinstance(a, np.ndarray) else a), u)
        cfg = dict(self.scenario.config)
        cfg.update({"action": {"type": "ContinuousAction"}, "screen_width": image_size, "screen_height": image_size,
                    "scaling": scaling, "offscreen_rendering": True, "show_trajectories": False})
        u.configure(cfg)
        self.u = u

    # ------------------------------------------------------------------------------------------------ episode
    def reset(self, seed: int):
        from highway_env.vehicle.behavior import IDMVehicle

        self.env.reset(seed=int(seed))
        u = self.u
        ego = u.vehicle
        road = u.road
        lane_index = road.network.get_closest_lane_index(ego.position, ego.heading)
        self.brain = IDMVehicle(road, ego.position.copy(), heading=ego.heading, speed=ego.speed,
                                target_lane_index=lane_index,
                                target_speed=self.scenario.target_speed or max(ego.speed, 8.0))
        self.brain.lane_index, self.brain.lane = lane_index, road.network.get_lane(lane_index)
        self.destination = None
        if self.scenario.name == "roundabout":
            self.destination = "nxs"
        elif self.scenario.name == "intersection":
            self.destination = "o" + str(int(u.np_random.integers(1, 4)))
        if self.destination is not None:
            self.brain.plan_route_to(self.destination)
        self.route_length = self._route_length()
        self.start = ego.position.copy()
        self.driven, self.remaining = 0.0, 0.0
        if self.route_length is not None:
            first = road.network.get_lane(self._lane_id(self.brain.route[0]))
            s0, _ = first.local_coordinates(ego.position)
            self.remaining = self.route_length - max(0.0, float(s0))
        self.instruction = self._instruction()
        self.steps, self.crashed, self.speeds, self.done = 0, False, [], False
        self.progress = 0.0
        return self.observation()

    def _route_length(self) -> float | None:
        route = getattr(self.brain, "route", None)
        if not route:
            return None
        net = self.u.road.network
        return float(sum(net.get_lane(self._lane_id(li)).length for li in route))

    @staticmethod
    def _lane_id(li):
        return (li[0], li[1], li[2] if li[2] is not None else 0)

    def _instruction(self) -> str:
        name = self.scenario.name
        if name == "highway":
            return "drive fast on the highway, change lanes to pass slower cars"
        if name == "merge":
            return "merge into the traffic ahead"
        if name == "roundabout":
            return "take the second exit at the roundabout"
        net, route = self.u.road.network, self.brain.route
        first = net.get_lane(self._lane_id(route[0]))
        h0 = first.heading_at(first.length)
        last = net.get_lane(self._lane_id(route[-1]))
        turn = math.atan2(math.sin(last.heading_at(0.0) - h0), math.cos(last.heading_at(0.0) - h0))
        if abs(turn) < math.pi / 4:
            return "go straight through the intersection"
        return f"turn {'right' if turn > 0 else 'left'} at the intersection"  # screen y points down

    # ------------------------------------------------------------------------------------------------ sensing
    def render_views(self) -> dict:
        """{camera: (3, S, S) uint8} top-down renderings."""
        u = self.u
        if u.viewer is None:
            self.env.render()
        out = {}
        for cam in self.cameras:
            u.viewer.sim_surface.centering_position = list(_CENTERING[cam])
            img = self.env.render()
            out[cam] = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return out

    def _front_gap(self) -> float:
        ego, road = self.u.vehicle, self.u.road
        front, _ = road.neighbour_vehicles(ego, road.network.get_closest_lane_index(ego.position, ego.heading))
        return 50.0 if front is None else float(min(50.0, ego.lane_distance_to(front)))

    def state(self) -> np.ndarray:
        ego = self.u.vehicle
        net = self.u.road.network
        lane = net.get_lane(net.get_closest_lane_index(ego.position, ego.heading))
        s, lat = lane.local_coordinates(ego.position)
        err = math.atan2(math.sin(ego.heading - lane.heading_at(s)), math.cos(ego.heading - lane.heading_at(s)))
        return np.array([ego.speed / 30.0, math.cos(ego.heading), math.sin(ego.heading), lat / 4.0, err,
                         self._front_gap() / 50.0], dtype=np.float32)

    def waypoint(self) -> np.ndarray:
        ego, net = self.u.vehicle, self.u.road.network
        li = self.brain.target_lane_index or self.brain.lane_index
        lane = net.get_lane(li)
        s, _ = lane.local_coordinates(ego.position)
        p = lane.position(s + 15.0, 0.0) - ego.position
        c, sn = math.cos(-ego.heading), math.sin(-ego.heading)
        return np.array([(c * p[0] - sn * p[1]) / 15.0, (sn * p[0] + c * p[1]) / 15.0], dtype=np.float32)

    def observation(self) -> dict:
        obs = {f"observation.images.{c}": v for c, v in self.render_views().items()}
        obs["observation.state"] = self.state()
        obs["observation.waypoint"] = self.waypoint()
        obs["task"] = self.instruction
        return obs

    # ------------------------------------------------------------------------------------------------ expert
    def expert_action(self) -> tuple[np.ndarray, int, int]:
        """IDM/MOBIL action in [-1, 1]^2, its skill id and the relevant camera (index into the candidates)."""
        ego, road, b = self.u.vehicle, self.u.road, self.brain
        b.position, b.heading, b.speed = ego.position.copy(), ego.heading, ego.speed
        b.lane_index = road.network.get_closest_lane_index(ego.position, ego.heading)
        b.lane = road.network.get_lane(b.lane_index)
        i = road.vehicles.index(ego)
        b.timer += 1.0 / self.u.config["policy_frequency"]  # MOBIL decides every LANE_CHANGE_DELAY seconds
        road.vehicles[i] = b  # the brain sees the other vehicles, not the ego
        try:
            b.act()
        finally:
            road.vehicles[i] = ego
        acc, steer = float(b.action["acceleration"]), float(b.action["steering"])
        a = np.clip(np.array([acc / 5.0, steer / (math.pi / 4)], dtype=np.float32), -1, 1)
        skill = self._skill(acc, steer)
        return a, skill, self._camera(steer, skill)

    def _skill(self, acc: float, steer: float) -> int:
        b, name = self.brain, self.scenario.name
        if acc < -2.0:
            return SKILLS.index("brake")
        if name in ("merge", "roundabout", "intersection") and b.speed < 4.0 and acc <= 0.5:
            return SKILLS.index("yield")
        if name == "merge" and b.lane_index[:2] in (("k", "b"), ("b", "c")):  # the merge zone
            return SKILLS.index("merge")
        if b.target_lane_index is not None and b.target_lane_index != b.lane_index \
                and b.target_lane_index[:2] == b.lane_index[:2]:
            return SKILLS.index("change_lane")
        if name in ("roundabout", "intersection") and abs(steer) > 0.05:
            return SKILLS.index("turn")
        return SKILLS.index("keep_lane")

    def _camera(self, steer: float, skill: int) -> int:
        cand = [c for c in self.cameras if c != "ego"]
        ego, road = self.u.vehicle, self.u.road
        _, rear = road.neighbour_vehicles(ego, road.network.get_closest_lane_index(ego.position, ego.heading))
        if SKILLS[skill] in ("change_lane", "merge", "turn") and abs(steer) > 0.02:
            name = "right" if steer > 0 else "left"  # screen y points down: positive steering turns right
        elif rear is not None and rear.speed > ego.speed + 1.0 and ego.lane_distance_to(rear) > -15.0:
            name = "behind"
        else:
            name = "ahead"
        return cand.index(name) if name in cand else 0

    # ------------------------------------------------------------------------------------------------ stepping
    def step(self, action) -> bool:
        """Apply a [-1, 1]^2 action; returns True when the episode is over."""
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1, 1)
        _, _, terminated, truncated, _ = self.env.step(a)
        ego = self.u.vehicle
        self.steps += 1
        self.speeds.append(float(ego.speed))
        self.crashed = self.crashed or bool(ego.crashed)
        self.progress = max(self.progress, self._progress())
        if self.scenario.name == "intersection" and not self.crashed and self.u.has_arrived(ego):
            self.progress = 1.0
        self.done = bool(terminated or truncated or self.crashed or self.steps >= self.scenario.max_steps
                         or self._arrived())
        return self.done

    def _arrived(self) -> bool:
        return self.route_length is not None and self.progress >= 0.95

    def _progress(self) -> float:
        """Highway / merge: fraction of the episode survived. Routed scenarios: distance driven (speed x step time)
        over the route length still ahead of the start position (lane-matching the ego on the roundabout ring was
        unreliable: the closest lane is often not a route lane)."""
        if self.route_length is None:  # highway / merge: survive the episode
            return self.steps / self.scenario.max_steps
        self.driven += float(self.u.vehicle.speed) / self.u.config["policy_frequency"]
        return float(min(1.0, self.driven / max(self.remaining, 1.0)))

    def metrics(self) -> dict:
        """Episode metrics: success, route completion, collision, mean speed, driving score (Bench2Drive-style:
        route completion x 0.6 per collision with a vehicle)."""
        rc = float(min(1.0, self.progress))
        success = (not self.crashed) and rc >= 0.95
        return {"success": float(success), "route_completion": rc, "collision": float(self.crashed),
                "mean_speed": float(np.mean(self.speeds)) if self.speeds else 0.0,
                "driving_score": rc * (0.6 if self.crashed else 1.0), "steps": self.steps}

    def close(self):
        self.env.close()


__all__ = ["SKILLS", "CAMERAS", "SCENARIOS", "Scenario", "DrivingEnv", "check_scenario", "STATE_DIM", "ACTION_DIM",
           "WAYPOINT_DIM"]
