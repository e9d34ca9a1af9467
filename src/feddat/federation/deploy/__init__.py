"""A Flower deployment on one machine (`feddat deploy`): the TLS material (certificates), the processes
(processes) and the orchestration of a SuperLink and its SuperNodes (deployment)."""
