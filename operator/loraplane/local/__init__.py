"""Local runs (`loraplane run`): the cluster's containers as local processes, from the same builders."""
